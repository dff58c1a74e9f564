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


def demographics(ds) -> dict:
    """Sex (M, F or O) and a ten-year age band of a header, for subgroup tables; nothing else of the patient.

    The age comes from PatientAge, else from StudyDate − PatientBirthDate (the dates themselves are
    not kept); 90 and over is one band, as HIPAA's Safe Harbor asks.

    >>> demographics({"PatientSex": "F", "PatientAge": "063Y"})
    {'sex': 'F', 'age_band': '60-69'}
    >>> demographics({"PatientBirthDate": "19300512", "StudyDate": "20240301"})
    {'age_band': '90+'}
    """
    out = {}
    sex = str(ds.get("PatientSex", "") or "").strip().upper()
    if sex in ("M", "F", "O"):
        out["sex"] = sex
    years = None
    age = str(ds.get("PatientAge", "") or "").strip().upper()
    if len(age) == 4 and age[:3].isdigit() and age[3] in "DWMY":
        years = int(age[:3]) / {"D": 365.25, "W": 52.18, "M": 12.0, "Y": 1.0}[age[3]]
    else:
        born, seen = str(ds.get("PatientBirthDate", "") or ""), str(ds.get("StudyDate", "") or "")
        if len(born) >= 8 and len(seen) >= 8 and born[:8].isdigit() and seen[:8].isdigit():
            years = int(seen[:4]) - int(born[:4]) - ((seen[4:8]) < (born[4:8]))
    if years is not None and 0 <= years < 130:
        out["age_band"] = "90+" if years >= 90 else f"{int(years) // 10 * 10}-{int(years) // 10 * 10 + 9}"
    return out


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
        # surrogateescape: a file name that is not UTF-8 (os gives its bytes as surrogates) keys by its bytes
        mac = hmac.new(self._secret, f"{kind}\x00{value}".encode("utf-8", "surrogateescape"), hashlib.sha256)
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
