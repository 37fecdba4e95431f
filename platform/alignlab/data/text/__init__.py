"""Caption text: the semantic parser (scene graphs of captions) shared by CAT filtering and concept heads."""
