"""``cellserve bench soak``: churn sessions for minutes and watch the server for leaks.

K workers each loop through sessions with the asyncio SDK: open, a random number of messages of
random T, then a clean ``close`` or an abrupt drop (the channel closed under the stream, half of
the time with a step still in flight). A small share of messages is replaced by an invalid step
(wrong dtype, rank or width, token id out of range, NaN/Inf, empty); each must be answered in the
stream with INVALID_ARGUMENT and leave the session usable. Anything else is an unexpected error.

Every ``--sample-every`` seconds the server's RSS, open fds, state slots and session counters are
read from /metrics, with the client-side step latency percentiles of the window. At the end the
churn stops and the soak waits (bounded) until the server reports every slot free.

Modules: ``plan`` (the settings), ``inputs`` (valid and invalid steps), ``churn`` (the workers and
their tally), ``probe`` (one reading of the server), ``recorder`` (samples over time), ``report``
(checks, table, JSON, PNG), ``run`` (the command). This package's import runs none of them.
"""
