"""Evaluation of GEAR models."""
