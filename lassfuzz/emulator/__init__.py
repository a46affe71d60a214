"""The emulator under test: a Unicorn x86-64 machine with a LASS shim."""
