"""The PKCS#11 adapter against a real SoftHSM2 token (DESIGN.md invariants 1, 2, 5;
TEST-CATALOGUE.md C.15, C.17, C.19, C.20), one module per concern."""
