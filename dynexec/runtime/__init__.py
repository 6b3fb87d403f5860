"""The runtime: lowering a routed model into a Program, the executors that run it, and
the op backends they call."""
