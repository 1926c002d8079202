"""What the tests share, one job a module (README's Layout names each)."""
