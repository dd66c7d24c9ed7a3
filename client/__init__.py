"""Client side: SDK (sync and asyncio), CLI subcommands, load generator and benchmarks."""
