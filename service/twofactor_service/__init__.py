"""TwoFactorService: the gRPC service that owns accounts' TOTP secret keys."""
