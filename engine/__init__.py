"""The engine side: supervision of the vLLM process, and a vLLM emulator for tests."""
