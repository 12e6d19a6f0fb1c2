"""Stand-in for slicer.i18n: translation is the identity outside the Slicer application."""


def tr(text):
    return text


def translate(context, text):
    return text
