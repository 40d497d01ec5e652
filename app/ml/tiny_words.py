"""The word list the tiny test models' tokenizers learn from.

Both tiny tokenizers (the CLIP BPE one shipped in app/ml/models/assets, and the T5 sentencepiece
one app/ml/flux/t5_tokenizer.py builds at first use) learn their pieces from these words, so that
common prompt words ("red", "circle", "photo") become single tokens in both encoders and tiny
models can learn word-level conditioning. Changing the list changes both tokenizers: regenerate the
shipped CLIP files (``python app/ml/models/assets/make_tiny_tokenizer.py``); the T5 one is rebuilt
by itself, since its cache folder is named by a hash of its inputs.

Standard library only, so the generator script can import it without torch.
"""

WORDS = """
a an the of in on at with and or to for by from is are this that it its
red green blue yellow orange purple pink brown black white gray grey gold silver cyan magenta
circle square triangle rectangle star heart line dot dots stripe stripes ring cross shape shapes
big small large tiny little bright dark light left right top bottom center middle corner
photo picture image painting drawing sketch render style art artwork portrait landscape
man woman person girl boy child face hand eyes hair smile dog cat bird horse car house tree
flower sky sun moon water sea river mountain city street forest field night day background
high quality detailed sharp blurry simple plain texture pattern color colour solid
one two three four five six seven eight nine ten
0 1 2 3 4 5 6 7 8 9
ohwx sks token concept class
""".split()
