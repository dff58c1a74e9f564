"""Storage: DICOM reading and geometry, de-identification, and the Zarr store. No Prefect here."""
