"""Enforcers: one small interface (`base.Enforcer`), one module per backend."""
