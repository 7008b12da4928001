"""File formats: Nanonis .sxm scans and Gaussian .cube orbitals."""
