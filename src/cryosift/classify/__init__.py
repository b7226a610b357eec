"""2D classification: clustering particle images into classes (seeds 001 and 004) and
alignment-aware classification.

Modules: ``features`` (masked pixels, randomised PCA, denoised images, rotation-invariant
Fourier-Bessel features, CTF phase flip), ``cluster`` (k-means++, Ward, class averages),
``align2d`` (reference-free multi-reference alignment classifier), ``balanced`` (BSK-means++),
``drvae`` (DRVAE + BSK-means++), ``methods`` (the registered clusterers), ``outputs`` (what
`cryosift classify` writes, and ``--select``). Nothing is imported here, so that importing one
stage does not pull in the others.
"""
