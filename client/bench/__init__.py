"""``cellserve bench``: load generator, same-run baselines (echo, naive stateless, raw ORT), report.

``runner`` (``cellserve bench``), ``checkpoint`` (``cellserve bench checkpoint``) and ``soak/``
(``cellserve bench soak``) are the commands; ``options`` their flags; ``command`` what they share (the
error exit, the model directory, the server they drive); ``serving`` starts servers as subprocesses;
``load`` and ``measure`` drive and time one target; ``baselines/`` the servers and in-process runs it
is compared with; ``metrics_scrape`` and ``procfs`` read a server's /metrics and its process tree;
``report`` the table, JSON and PNG.
"""
