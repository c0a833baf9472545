"""Stage 6: what was rewritten, what was not, and why (report.json, graph dumps, tables, log lines)."""
from .launches_chosen import chosen_launches, format_chosen_launches
from .report import GraphReport, Report, current_report, format_table, log_graph, write_dumps

__all__ = ["GraphReport", "Report", "chosen_launches", "current_report", "format_chosen_launches", "format_table",
           "log_graph", "write_dumps"]
