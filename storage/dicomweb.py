"""A PACS as the source: QIDO-RS to list series, WADO-RS to fetch the new ones (dicomweb-client).

``data.source: dicomweb://host:port/path`` (http) or ``dicomweb+https://host/path``. Only
series that the store does not hold yet (by pseudonymous key and instance count) are
fetched, into a staging folder outside the store; from there the usual file ingest reads
them. Connection faults and 5xx answers are retried with backoff.
"""

from __future__ import annotations

import logging
from collections import defaultdict
from dataclasses import dataclass
from pathlib import Path

import pydicom
from pydicom.dataset import Dataset

from storage.deid import Pseudonymizer

logger = logging.getLogger(__name__)
SCHEMES = {"dicomweb://": "http://", "dicomweb+http://": "http://", "dicomweb+https://": "https://"}


def is_dicomweb(source: str) -> bool:
    return any(source.startswith(s) for s in SCHEMES)


def http_url(source: str) -> str:
    """``dicomweb://host:8042/dicom-web`` → ``http://host:8042/dicom-web``.

    >>> http_url("dicomweb+https://pacs.example.org/wado")
    'https://pacs.example.org/wado'
    """
    for scheme, http in SCHEMES.items():
        if source.startswith(scheme):
            return http + source[len(scheme):]
    raise ValueError(f"Received source={source!r}, expected a dicomweb:// URL.")


def make_client(source: str, *, retries: int = 3):
    """A DICOMweb client whose HTTP session retries connection faults and 5xx answers with backoff."""
    import requests
    from dicomweb_client.api import DICOMwebClient

    from medflow.access import check_allowed

    check_allowed(source, "data.source")  # under medflow serve: only hosts allowed with --allow-url
    from requests.adapters import HTTPAdapter
    from urllib3.util.retry import Retry

    session = requests.Session()
    retry = Retry(total=retries, connect=retries, read=retries, backoff_factor=0.5,
                  status_forcelist=(429, 500, 502, 503, 504), allowed_methods=None, raise_on_status=False)
    session.mount("http://", HTTPAdapter(max_retries=retry))
    session.mount("https://", HTTPAdapter(max_retries=retry))
    return DICOMwebClient(url=http_url(source), session=session)


@dataclass(frozen=True)
class RemoteSeries:
    study_uid: str
    series_uid: str
    instances: int
    series_key: str


def list_series(client, pseudo: Pseudonymizer, *, page: int = 500) -> list[RemoteSeries]:
    """Every series the server lists (QIDO-RS), paged."""
    out, offset = [], 0
    while True:
        batch = client.search_for_series(fields=["NumberOfSeriesRelatedInstances"], offset=offset, limit=page)
        for item in batch:
            ds = Dataset.from_json(item)
            uid = str(ds.SeriesInstanceUID)
            out.append(RemoteSeries(str(ds.StudyInstanceUID), uid,
                                    int(ds.get("NumberOfSeriesRelatedInstances", 0) or 0), pseudo.series_key(uid)))
        if len(batch) < page:
            return out
        offset += page


def known_instances(catalog: dict[str, dict], quarantine: list[dict]) -> dict[str, int]:
    """Instances the store already accounts for, per series key (ingested files + quarantined files)."""
    counts: dict[str, int] = defaultdict(int)
    for key, entry in catalog.items():
        counts[entry.get("parent", key)] += int(entry.get("n_files", 0))
    for row in quarantine:
        if row.get("series_key"):
            counts[row["series_key"]] += 1
    return dict(counts)


def series_to_pull(remote: list[RemoteSeries], known: dict[str, int]) -> list[RemoteSeries]:
    """Series that are new, or have more instances than the store accounts for."""
    return [s for s in remote if known.get(s.series_key, 0) < s.instances]


def pull_series(client, series: RemoteSeries, staging: Path) -> int:
    """Fetch one series (WADO-RS) into ``staging/<series key>/`` (pseudonymous names); returns files written."""
    folder = staging / series.series_key
    folder.mkdir(parents=True, exist_ok=True)
    instances = client.retrieve_series(series.study_uid, series.series_uid)
    for i, ds in enumerate(instances):
        pydicom.dcmwrite(folder / f"{i:05d}.dcm", ds, enforce_file_format=True)
    return len(instances)
