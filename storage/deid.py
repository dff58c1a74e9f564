"""De-identification: pseudonymous keys and the attributes allowed into the store.

Keys are HMAC-SHA256 of an identifier under a per-store secret: the same UID gets the same
key on every ingest into the same store, and a key cannot be turned back into the UID
without the secret (which never leaves the store folder).
"""

from __future__ import annotations

import hashlib
import hmac

# Acquisition facts that identify no one; everything else in a header is dropped.
SAFE_ATTRIBUTES = (
    "Modality",
    "Manufacturer",
    "ManufacturerModelName",
    "KVP",
    "SliceThickness",
    "ConvolutionKernel",
    "BodyPartExamined",
    "PhotometricInterpretation",
    "BitsStored",
)

# Attributes that identify a patient or a study; kept only when de-identification is off.
IDENTIFYING_ATTRIBUTES = (
    "PatientID",
    "PatientName",
    "PatientBirthDate",
    "StudyInstanceUID",
    "SeriesInstanceUID",
    "AccessionNumber",
    "StudyDate",
    "InstitutionName",
)


class Pseudonymizer:
    """Turns identifiers into stable pseudonyms.

    Args:
        secret: the store's secret bytes.

    >>> p = Pseudonymizer(b"s" * 32)
    >>> p.key("1.2.3") == p.key("1.2.3") and p.key("1.2.3") != p.key("1.2.4")
    True
    >>> len(p.key("1.2.3"))
    20
    """

    def __init__(self, secret: bytes, *, length: int = 20):
        if len(secret) < 16:
            raise ValueError(f"Received a secret of {len(secret)} bytes, expected at least 16.")
        self._secret = secret
        self._length = length

    def key(self, value: str, *, kind: str = "") -> str:
        """A hex pseudonym of ``value`` (empty values map to an empty key)."""
        value = str(value or "").strip()
        if not value:
            return ""
        mac = hmac.new(self._secret, f"{kind}\x00{value}".encode(), hashlib.sha256)
        return mac.hexdigest()[: self._length]

    def series_key(self, series_uid: str) -> str:
        return "s" + self.key(series_uid, kind="series")[:15]

    def patient_key(self, patient_id: str) -> str:
        return self.key(patient_id, kind="patient")

    def study_key(self, study_uid: str) -> str:
        return self.key(study_uid, kind="study")

    def accession_key(self, accession: str) -> str:
        return self.key(accession, kind="accession")

    def digest(self, items: list[str]) -> str:
        """A keyed digest of a list of strings (e.g. SOP UIDs and sizes)."""
        mac = hmac.new(self._secret, b"digest", hashlib.sha256)
        for item in items:
            mac.update(item.encode())
            mac.update(b"\x00")
        return mac.hexdigest()[:32]
