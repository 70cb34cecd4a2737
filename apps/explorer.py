# ---
# jupyter:
#   jupytext:
#     formats: py:percent
#     text_representation:
#       extension: .py
#       format_name: percent
#   kernelspec:
#     display_name: babel
#     language: python
#     name: babel
# ---

# %% [markdown]
# # Expert activation frequencies, per layer and language
#
# Each dense feed-forward layer is viewed as a mixture of small experts (notebook 01); notebook 02 counts,
# for every language of the corpus, how often each expert is activated per token. Pick a model, a language
# (or the difference to the mean of all languages, or between two languages), a range of layers, how the
# experts of each layer are ordered, the colour scale and the noise floor of differences; click a cell for that
# expert across languages and layers. The address bar keeps the view (a reload or a shared link restores it),
# and the displayed matrix downloads as CSV. The embedded models are 4-bit quantised GGUF
# weights, dequantised to float.

# %% tags=["parameters"]
profile = "default"  # configs/<profile>.yaml; the frequencies of that run are shown
model = ""  # empty: the profile's models; else the model name (or comma-separated list) of the run

# %%
from babel_lib.babel.explorer import explorer_app

explorer_app(profile, model, url_state=True, served_plotly=True)
