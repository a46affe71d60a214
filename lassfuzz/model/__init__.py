"""The reference model: an executable LASS specification and an independent x86-64 interpreter."""
