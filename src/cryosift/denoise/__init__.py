"""Learned and statistical denoisers: Noise2Noise, Noise2Void, CDAE, covariance Wiener filter."""
