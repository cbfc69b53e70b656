"""SAM-assisted annotation in the browser: ``sam4med annotate DIR`` (COSMOS: SAM's best use in medical
imaging is as an annotation aid). The session holds the state; the server is a thin HTTP shell over it."""
