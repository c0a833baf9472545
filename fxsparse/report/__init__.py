"""Stage 6: what was rewritten, what was not, and why (report.json, graph dumps, tables, log lines)."""
from .report import GraphReport, Report, current_report, format_table, log_graph, write_dumps

__all__ = ["GraphReport", "Report", "current_report", "format_table", "log_graph", "write_dumps"]
