"""Depth pruning: representation similarity (CKA ...), the block search, and the width-or-depth hybrid."""
