"""``ssl report`` and ``ssl compare --report``: self-contained HTML pages about runs.

:mod:`~sslcli.report.gather` reads and computes what is shown, :mod:`~sslcli.report.sections`
writes each section's HTML from it with the page's building blocks
(:mod:`~sslcli.report.html`) and charts (:mod:`~sslcli.report.svgplot`);
:mod:`~sslcli.report.run` and :mod:`~sslcli.report.compare` put the pages together.
"""
