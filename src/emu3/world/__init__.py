"""The shapes world: procedural scenes, captions, questions, videos and stories with exact ground
truth (`scenes`, `motion`, `stories`), and the datasets the built-in model is trained on (`build`)."""
