"""What a run leaves for people: the console summary, the files on disk, the plots.

Everything is derived from one :class:`~echo_env.cachetest.results.TestResult`, and
everything written or printed goes through :func:`redact`.
"""

from echo_env.report.console import format_console
from echo_env.report.files import RunWriter, write_json_file, write_records
from echo_env.report.redact import redact

__all__ = ["RunWriter", "format_console", "redact", "write_json_file", "write_records"]
