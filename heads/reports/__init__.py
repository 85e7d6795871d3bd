"""What results look like on paper: Markdown tables from result dicts (``tables.py``), the papers'
published tables and how our rows match theirs (``papers.py`` over ``paper_tables.json``), figures
(``figures.py``), the ``report`` command's reading of run, compare, grid and robustness folders
(``folders.py``), and every finished run under some folders as one table (``runs.py``, the ``runs``
command).

May import: ``heads.metrics`` and ``heads.errors`` only. Reports read result dicts and files; they
import nothing that trains, so anything above may use them (a run writes its ``table.md`` here).
"""
