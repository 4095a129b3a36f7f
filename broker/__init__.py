"""keybroker: a gRPC key broker holding keys in EU-operated HSMs through PKCS#11."""
