"""Figures and pages that show results: FRC plots, montages, the HTML report."""
