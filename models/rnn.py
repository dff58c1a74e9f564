"""Recurrent models for waveforms (ECG): GRU, LSTM, and a 1D CNN front end followed by a GRU.

A waveform reaches a model as (samples, leads, 1), the layout every classifier input has
(``medflow.kinds``); the first layer drops the channel axis so that the recurrent layers see
a sequence of ``leads``-dimensional samples. Keras 3 layers only (any backend).
"""

from __future__ import annotations

import keras
from keras import layers

from models.cnn2d import classifier_head


def _sequence(input_shape):
    inputs = keras.Input(shape=tuple(input_shape))
    return inputs, layers.Reshape(tuple(input_shape[:2]), name="sequence")(inputs)


def _recurrent(cell, units: int, *, bidirectional: bool, return_sequences: bool, name: str):
    layer = cell(units, return_sequences=return_sequences, name=name)
    return layers.Bidirectional(layer, name=f"bi_{name}") if bidirectional else layer


def _rnn(cell, name: str, input_shape, n_classes: int, units: list[int] | tuple[int, ...], bidirectional: bool,
         downsample: int, dropout: float) -> keras.Model:
    inputs, x = _sequence(input_shape)
    if downsample > 1:  # a recurrent layer over thousands of steps is slow and forgets: average first
        x = layers.AveragePooling1D(downsample, name="downsample")(x)
    for i, n in enumerate(units):
        x = _recurrent(cell, n, bidirectional=bidirectional, return_sequences=i < len(units) - 1, name=f"rnn{i}")(x)
    x = layers.Dropout(dropout)(x)
    return keras.Model(inputs, classifier_head(x, n_classes), name=name)


def build_gru(input_shape=(1250, 12, 1), *, n_classes: int = 2, units=(64,), bidirectional: bool = False,
              downsample: int = 4, dropout: float = 0.2) -> keras.Model:
    """Stacked GRU layers (the last returns its final state), dropout, the class head."""
    return _rnn(layers.GRU, "gru", input_shape, n_classes, units, bidirectional, downsample, dropout)


def build_lstm(input_shape=(1250, 12, 1), *, n_classes: int = 2, units=(64,), bidirectional: bool = False,
               downsample: int = 4, dropout: float = 0.2) -> keras.Model:
    """Stacked LSTM layers, optionally bidirectional."""
    return _rnn(layers.LSTM, "lstm", input_shape, n_classes, units, bidirectional, downsample, dropout)


def build_cnn_gru(input_shape=(1250, 12, 1), *, n_classes: int = 2, filters=(32, 64, 64), kernel: int = 7,
                  units: int = 64, bidirectional: bool = True, dropout: float = 0.2) -> keras.Model:
    """The common ECG architecture: 1D convolutions (each with batch norm, ReLU and 2x max pooling)
    learn the shapes of waves, a GRU reads their order over time, and its outputs are pooled (mean and
    max) over every step."""
    inputs, x = _sequence(input_shape)
    for i, f in enumerate(filters):
        x = layers.Conv1D(f, kernel, padding="same", use_bias=False, name=f"conv{i}")(x)
        x = layers.BatchNormalization(name=f"bn{i}")(x)
        x = layers.Activation("relu", name=f"relu{i}")(x)
        x = layers.MaxPooling1D(2, name=f"pool{i}")(x)
    x = _recurrent(layers.GRU, units, bidirectional=bidirectional, return_sequences=True, name="gru")(x)
    # pooled over every step: the decision uses the whole trace, not the ends the final states remember best
    x = layers.Concatenate(name="pooled")([layers.GlobalAveragePooling1D()(x), layers.GlobalMaxPooling1D()(x)])
    x = layers.Dropout(dropout)(x)
    return keras.Model(inputs, classifier_head(x, n_classes), name="cnn_gru")
