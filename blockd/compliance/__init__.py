"""The regulator's side: signed orders + operators' keys + their attestation statements -> who
complies with what, by when, and which statements do not hold up.

    statements.py  files -> verified, parsed Statements (the ONE place statement JSON is read)
    evaluate.py    pure: expected orders x operators' statement chains, now -> Report
    report.py      Report -> text, and the `--json` document (docs/compliance.schema.json)
    html.py        Report -> one self-contained HTML page (inline CSS and SVG, no network)
    fixture.py     N simulated operators' statements from real passes (tests and the demo)
"""
