"""``reelserve loadtest``: closed/open-loop load against a deployment, a JSON report and PNGs."""
