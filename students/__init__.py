"""Student architectures and how they are initialised from a teacher.

Each builder takes the frozen teacher (as ``teacher=``) plus its own settings and returns a
``transformers.PreTrainedModel`` that shares the teacher's tokenizer.
"""
