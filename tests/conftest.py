"""Shared pytest setup: the tests folder and the client SDK are importable; small torch threads."""

from __future__ import annotations

import os
import sys

import torch

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)
sys.path.insert(0, os.path.join(os.path.dirname(HERE), "clients", "python"))
torch.set_num_threads(1)  # 2-core CI box: more threads only contend
