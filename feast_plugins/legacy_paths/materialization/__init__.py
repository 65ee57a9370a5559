"""Deprecated 0.1 import paths of the Feast plugins (see derm.feast_plugins); removed in 0.3."""
