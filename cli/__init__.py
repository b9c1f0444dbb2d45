"""Click commands: parse options, call the library, print. No algorithms live here."""
