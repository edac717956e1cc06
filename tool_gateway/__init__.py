"""Conveyor's tool gateway: hosts the tools and runs their command units."""
