"""Who signed a release and whether a policy trusts them: OpenSSF Model Signing
statements and bundles (oms), key and certificate signers, Sigstore keyless signing,
the trust policy, and the checks that apply it (bundle, verify)."""
