"""Generated client code of TwoFactorService; the API lives in `twofactor.v1`."""
