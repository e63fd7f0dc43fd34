"""The whole stack as local processes on 127.0.0.1: ``histomarker up`` / ``down``.

``processes`` finds and stops process groups exactly (never a process that is not
ours), ``state`` keeps the PIDs and ports of a running stack in a file that another
``histomarker down`` reads, ``stack`` starts the components in order with readiness
waits and stops them in reverse order.
"""
