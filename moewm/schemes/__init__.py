"""Watermarking schemes behind one interface (:class:`moewm.schemes.base.Watermarker`), built by kind from the registry."""
