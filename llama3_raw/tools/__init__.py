"""Tools for looking inside, each a library module with a small command line (`python -m llama3_raw TOOL`):

inspection.py   logit lens, attention maps and a shapes trace of one forward pass (`inspect`)
compare.py      this project's forward against Meta's reference, block by block (`compare`, via reference.py)
score.py        perplexity and nats per character of a text (`score`)
"""
