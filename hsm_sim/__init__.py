"""Simulated HSMs for tests (never imported by the server, never packaged with it).

- `tokens`: several SoftHSM2 tokens on one softhsm2.conf, each declared as another operator in
  another country (FR, DE, and the US, outside the EU/EEA).
- `faulty`: `FaultyHsm`, a wrapper at the `Hsm` port that fails, slows down or hangs on the
  calls chosen (at random too, with a seed); `from_spec` is the factory a broker process's
  `fault_injection` setting names (docs/operations.md).
- `faults`: faults for the one PyKCS11 gate of the adapter (`FailOnCall`, `CallLog`).
"""
