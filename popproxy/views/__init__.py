"""Everything a person looks at: the theme, pure render functions and the live view."""
