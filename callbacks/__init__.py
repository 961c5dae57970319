"""Lightning callbacks that read the engine's stats (monitor, plan summary, memory timeline). Not written
yet; they follow the Lightning strategy."""
