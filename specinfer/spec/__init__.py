"""Speculation: token trees, SSM expansion, verification and sampling."""
