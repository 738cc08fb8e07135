"""Acquire: build a class-per-folder RAW tree from the web, with provenance.

    audioshard fetch youtube --links links.csv --out raw/      # yt-dlp: YouTube, playlists, channels, direct links
    audioshard fetch drive --label speech --out raw/ FOLDER    # gdown: a shared Google Drive folder

`audioshard.acquire.youtube` and `audioshard.acquire.drive` import yt-dlp and gdown; this package
itself imports only the shared helpers, so the build can read provenance without them.
"""

from audioshard.acquire.common import AcquireError, FetchSummary, Outcome, provenance_rows, read_sources

__all__ = ["AcquireError", "FetchSummary", "Outcome", "provenance_rows", "read_sources"]
