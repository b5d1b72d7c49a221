"""The ready-made checks as pytest tests, for your own model and your own training setup::

    pytest --pyargs lmcheck.suite --lmcheck-model ./my-model
    pytest --pyargs lmcheck.suite --lmcheck-model my_project.lm:build --lmcheck-tokenizer gpt2
    pytest --pyargs lmcheck.suite --lmcheck-trainer my_project.train:make_trainer

The modules here hold only the tests; the batteries they run and the loaders of the model or
setup you name live in :mod:`lmcheck.batteries`.
"""
