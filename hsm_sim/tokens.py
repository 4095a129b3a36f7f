"""Several simulated HSMs on one SoftHSM2 configuration.

A process can use only one softhsm2.conf, but the conf may hold many tokens. Each simulated
HSM is one token declared as another operator in another country, so that tests can exercise
jurisdiction rules (DESIGN.md invariant 8) on one machine: `FR` and `DE` inside the EU/EEA,
`US` outside it.

    tokens = ensure_tokens(home)                     # every token of FLEET, initialised once
    hsm = tokens["de-frankfurt"].open()              # a Pkcs11Hsm (caller closes it)
    configs = hsm_configs(home, (FR, US))            # HsmConfig entries for a broker
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

from broker.adapters.pkcs11 import Pkcs11Hsm, Pkcs11Library
from broker.config import HsmConfig
from broker.devhsm import SoftHsmToken, ensure_token
from broker.ports import HsmInfo


@dataclass(frozen=True, slots=True)
class SimulatedHsm:
    """How one simulated HSM is declared.

    Attributes:
        label: the SoftHSM2 token label.
        info: the HSM's name, jurisdiction and operator as the broker sees them.
        pin_file: file name of the user PIN, under the SoftHSM2 home.
    """

    label: str
    info: HsmInfo
    pin_file: str

    def config(self, home: Path) -> HsmConfig:
        """The broker's configuration of this HSM (its token initialised at start if need be)."""
        return HsmConfig(
            name=self.info.name,
            jurisdiction=self.info.jurisdiction,
            operator=self.info.operator,
            token_label=self.label,
            pin_file=Path(home) / self.pin_file,
            softhsm_init=True,
        )


#: Operated in France (the broker's default HSM in tests).
FR = SimulatedHsm("keybroker", HsmInfo("local", "FR", "test SoftHSM2"), "hsm.pin")
#: Operated in Germany by another operator.
DE = SimulatedHsm(
    "de-frankfurt",
    HsmInfo("de-frankfurt", "DE", "test SoftHSM2 declared in Germany"),
    "hsm-de-frankfurt.pin",
)
#: Declared in the United States: outside the EU/EEA, refused by the default policy.
US = SimulatedHsm(
    "us-east", HsmInfo("us-east", "US", "test SoftHSM2 declared in the US"), "hsm-us-east.pin"
)
#: Every simulated HSM.
FLEET: tuple[SimulatedHsm, ...] = (FR, DE, US)


@dataclass(frozen=True, slots=True)
class SimulatedToken:
    """A simulated HSM whose token is initialised."""

    hsm: SimulatedHsm
    token: SoftHsmToken

    @property
    def library(self) -> Pkcs11Library:
        return self.token.library

    def open(self, pool_size: int = 4, lease_timeout: float = 5.0) -> Pkcs11Hsm:
        """A `Pkcs11Hsm` on this token (the caller closes it)."""
        return Pkcs11Hsm(
            self.token.library,
            self.token.label,
            self.token.pin(),
            self.hsm.info,
            pool_size,
            lease_timeout=lease_timeout,
        )


def ensure_tokens(
    home: Path,
    hsms: Iterable[SimulatedHsm] = FLEET,
    library: Pkcs11Library | None = None,
) -> dict[str, SimulatedToken]:
    """Initialises the token of each simulated HSM under HOME (once; later calls reuse them).

    Args:
        home: the SoftHSM2 home (HOME/softhsm2.conf, HOME/tokens, the PIN files).
        hsms: which simulated HSMs.
        library: the process's loaded module (see `broker.devhsm.ensure_token`).

    Returns:
        The tokens by HSM name.
    """
    tokens: dict[str, SimulatedToken] = {}
    for hsm in hsms:
        token = ensure_token(home, hsm.label, Path(home) / hsm.pin_file, library=library)
        library = token.library
        tokens[hsm.info.name] = SimulatedToken(hsm, token)
    return tokens


def hsm_configs(home: Path, hsms: Iterable[SimulatedHsm] = FLEET) -> tuple[HsmConfig, ...]:
    """The broker's configuration of each simulated HSM, tokens initialised at start."""
    return tuple(hsm.config(home) for hsm in hsms)
