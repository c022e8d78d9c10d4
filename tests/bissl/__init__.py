"""Tests of the BiSSL application (applications/bissl)."""
