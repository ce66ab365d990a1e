"""histoboost's version, in a module of its own so that every part of the package can name it without importing the
package's public face (histoboost/__init__.py), which imports them."""

__version__ = "0.9.0"
