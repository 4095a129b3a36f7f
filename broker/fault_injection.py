"""Tests only: an HSM wrapped with injected faults, chosen by the `[[hsm]]` settings
`fault_injection` and `fault_spec` (docs/operations.md, "Fault injection").

The server never imports a fault injector: the module is named in the configuration and
loaded here with importlib, and only when the environment also says
KEYBROKER_ALLOW_FAULT_INJECTION=1, so that a test configuration that reaches production
refuses to start instead of failing calls on purpose. The repository's injector is
`hsm_sim.faulty:from_spec` (not packaged with the server: run from the repository, or put it
on PYTHONPATH).
"""

from __future__ import annotations

import importlib
import logging
import os
from collections.abc import Mapping
from typing import cast

from broker.config import FAULT_INJECTION_ENV, ConfigError, HsmConfig
from broker.ports import Hsm

log = logging.getLogger(__name__)


def with_faults(hsm: Hsm, cfg: HsmConfig, env: Mapping[str, str] | None = None) -> Hsm:
    """`hsm` as the configured injector wraps it, or `hsm` itself when none is configured.

    Raises:
        ConfigError: injection is configured but not allowed by the environment, the
            injector cannot be loaded, or it refuses the spec; one line saying which.
    """
    if not cfg.fault_injection:
        return hsm
    env = os.environ if env is None else env
    if env.get(FAULT_INJECTION_ENV) != "1":
        raise ConfigError(
            f"HSM {cfg.name!r}: fault_injection is for tests only; set "
            f"{FAULT_INJECTION_ENV}=1 to use it"
        )
    module_name, _, function = cfg.fault_injection.partition(":")
    try:
        factory = getattr(importlib.import_module(module_name), function)
    except (ImportError, AttributeError) as exc:
        raise ConfigError(
            f"HSM {cfg.name!r}: cannot load fault injector {cfg.fault_injection!r} ({exc})"
        ) from exc
    try:
        wrapped = factory(hsm, cfg.fault_spec)
    except (ValueError, OSError) as exc:
        raise ConfigError(f"HSM {cfg.name!r}: fault_spec refused: {exc}") from exc
    log.warning(
        "HSM %r runs with INJECTED FAULTS (%s: %s): for tests only",
        cfg.name,
        cfg.fault_injection,
        cfg.fault_spec,
    )
    return cast(Hsm, wrapped)
